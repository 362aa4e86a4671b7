"""Per-sample gradient quantities from one batched forward+backward.

Confidence scoring needs, for every sample x of a batch, ``a(x) = sum_i w_i g_{x,i}`` and
``n(x) = sum_i (M F)_i g_{x,i}**2``; the empirical Fisher needs ``sum_x g_{x,i}**2``. None of them needs a
whole-model gradient per sample. One forward of the batch records, for every module that owns trainable
parameters, its inputs; one backward of ``sum_x l_x`` records the gradient of its output (for sample x it is
``d l_x / d out_x``, since samples do not interact). From these, each module gives its per-sample parameter
gradients, layer by layer:

* ``nn.Linear`` (and so LoRA's A/B): ``G_x = sum_t b_t a_t^T``; bias ``sum_t b_t``.
* ``transformers``' ``Conv1D`` (GPT-2, transposed weight): ``G_x = sum_t a_t b_t^T``.
* ``nn.Embedding``: rows of the sample's tokens, ``G_x[v] = sum_{t: id_t = v} b_t`` (``padding_idx`` excluded),
  times ``s`` for a subclass whose output is ``s * lookup`` (Gemma's ``embed_scale``).
* the output layer, when the loss is the response loss (``loss_fn=None``) and the model's output layer allows it
  (:mod:`hf_lwf.method.head`): the layer runs on an empty sequence, the loss forms the logits of the labelled
  tokens a chunk at a time, and ``G_x[rows] = sum_t b_t[rows] h_t^T`` is formed per block of rows with the logits'
  gradient ``b_t[rows]`` recomputed from the kept log-sum-exp (:class:`_HeadRecord`): no ``[batch, tokens, vocab]``
  tensor, and prompt and padding positions cost nothing.
* ``nn.LayerNorm``: weight ``sum_t b_t * xhat_t``, bias ``sum_t b_t``; Llama-style ``*RMSNorm`` the same.
* anything else: ``torch.func.vmap`` of the gradient of ``<module(a_x), b_x>`` with respect to the module's own
  parameters (every argument whose first dimension is the batch split per sample), or, if that transform
  fails, a per-sample backward through that module only.

No rule is trusted blindly (:class:`_Plan`): the first pass over a model checks every module class once against
plain per-sample autograd of that module, and watches how every wanted parameter is used. A class whose rule
does not match takes the vmap path. Parameters that no module-level path covers (used outside a call of their
module, as PEFT's ``ParameterDict`` adapters are; owned by modules not called on batch-first tensors, as fused
MoE experts are) take the exact path: one ``torch.autograd.grad`` of each sample's loss. A rule class called on
flattened tokens (OPT's ``[batch * tokens, hidden]``) keeps its rule once one exact backward of a single sample's
loss has shown its rows grouped by sample. After the pass every wanted parameter must have received its
contribution, or the pass raises.

The per-sample gradient of a weight is formed in chunks of rows (at most ``chunk_elements`` numbers at once; on the
CPU at most :data:`CPU_CHUNK_ELEMENTS`), reduced to the per-sample scalars (or the Fisher sums) and dropped at once.
Its contraction takes the recorded 16-bit activations and output gradients of a 16-bit model as they are and
accumulates in fp32 (:func:`~hf_lwf.method.common.matmul_f32`: tensor cores on a GPU, no fp32 copies; the same
fp32 result as upcasting first, since products of 16-bit numbers are exact in fp32). A linear consumer's
``sum_t b_t . (w a_t)`` splits the fp32 ``w`` into two bf16 halves for bf16 activations
(:func:`~hf_lwf.method.common.project_f32`). A module call's recorded tensors are dropped as soon as its
parameters are done, so the backward does not hold every layer's inputs and output gradients to its end. A parameter used by several modules
(tied ``lm_head``/embedding) has one gradient per sample, the *sum* of the uses: its chunks are summed over
uses before they are squared. Only the parameters' own per-sample gradients are formed; the autograd pass itself
runs with the parameters frozen, so it computes input gradients only.

Under FSDP2 every rank runs the same batch (FSDP gathers each layer's weights for its forward and backward, as in
training) and forms the per-sample gradients of the rows of its own shard only: the consumers receive row blocks
numbered as in the full parameter, and their per-sample sums are partial sums that the caller adds across ranks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..distributed import is_sharded, local_rows, local_view
from .common import TensorDict, batch_losses, matmul_f32, project_f32, without_input_require_grads
from .head import (
    Selection,
    autocast_dtype,
    chunked_cross_entropy,
    head_hidden,
    linear_head,
    logits_f32,
    loss_chunk_elements,
    select_labelled,
)


try:  # transformers' GPT-2 style linear layer: ``y = x @ W + b`` with ``W`` of shape [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ELEMENTS = 1 << 25
"""Default bound on the per-sample gradient numbers formed at once (32 Mi fp32 numbers, 128 MiB)."""
CPU_CHUNK_ELEMENTS = 1 << 22
"""The bound on the CPU, whatever is asked (4 Mi numbers, 16 MiB): a row block then stays in the cache between the
matmul that forms it and the reductions that read it (one SmolLM2 MLP layer's pass measured 27 ms against 40 ms
for the whole 28 MB block); on a GPU larger blocks mean fewer kernel launches."""


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


class _Use:
    """One call of a module during the recorded forward."""

    __slots__ = ("module", "kind", "args", "kwargs", "grad", "cache", "scale", "autocast", "node", "reached", "open")

    def __init__(self, module, kind, args, kwargs, scale=1.0, autocast=None):
        self.module, self.kind, self.args, self.kwargs = module, kind, args, kwargs
        self.grad: torch.Tensor | None = None
        self.node = None  # the autograd node of the hooked output
        self.reached = False  # whether the backward delivered its output gradient
        self.cache: dict[str, torch.Tensor] | None = None
        self.scale = scale
        self.autocast = autocast
        self.open = 1  # parameters of this call whose per-sample gradients are not formed yet

    def done(self) -> None:
        """One of this call's parameters is finished; after the last, drop its recorded input and output gradient
        (the backward goes on without them: the pass does not hold every layer's tensors until its end)."""
        self.open -= 1
        if self.open <= 0:
            self.args = self.kwargs = self.grad = self.cache = None

    def release(self) -> None:
        """Drop the recorded tensors and the autograd node.

        The node holds this use through the output's tensor hook, so ``use -> node -> hook -> use`` is a cycle
        through C++ that the garbage collector cannot see: left in place, it keeps the recorded activations of
        every pass alive."""
        self.args = self.kwargs = self.grad = self.cache = self.node = None


def _kind(module: torch.nn.Module) -> str:
    """The per-sample rule a module's class would take, before the class is checked (see :class:`_Plan`)."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if Conv1D is not None and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.LayerNorm):
        return "layernorm"
    if "RMSNorm" in type(module).__name__ and _rms_eps(module) is not None:
        return "rmsnorm"
    return "generic"


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


_ROW_KINDS = {("linear", "weight"), ("conv1d", "weight"), ("embedding", "weight"), ("head", "weight")}


class _HeadRecord:
    """The output layer's part of the response loss (:mod:`hf_lwf.method.head`), kept from the forward for its
    per-sample weight gradient: the labelled tokens' inputs, targets, loss weights (times the loss scale) and
    log-sum-exp, padded per sample to ``[batch, width]``. ``values``: ``sum_i v_i g_{x,i}`` for a linear consumer,
    formed in the forward from each chunk's logit gradients."""

    def __init__(self, selection: Selection, batch: int, scale: float, dtype: torch.dtype | None):
        width, device = selection.width, selection.hidden.device
        self.dtype = dtype  # the loss's matmul dtype under an enclosing autocast: logits recomputed alike
        index = (selection.sample, selection.slot)
        self.hidden = selection.hidden.new_zeros(batch, width, selection.hidden.shape[-1])
        self.hidden[index] = selection.hidden.detach()
        self.targets = torch.zeros(batch, width, dtype=torch.long, device=device)
        self.targets[index] = selection.targets
        self.weight = torch.zeros(batch, width, dtype=torch.float32, device=device)
        self.weight[index] = selection.weight * scale
        self.lse = torch.zeros(batch, width, dtype=torch.float32, device=device)
        self.index, self.width = index, width
        self.values: torch.Tensor | None = None

    def grad(self, weight: torch.Tensor, rows: slice | None) -> torch.Tensor:
        """Per-sample gradients ``[batch, rows, hidden]`` (fp32) of ``weight[rows]``: ``sum_t b_t h_t^T`` with each
        token's logit gradient ``b_t`` (softmax minus one-hot, times its loss weight) recomputed for these rows."""
        start, stop = (0, weight.shape[0]) if rows is None else (rows.start, rows.stop)
        batch, width, size = self.hidden.shape
        hidden = self.hidden if self.dtype is None else self.hidden.to(self.dtype)
        rows_ = weight[start:stop] if self.dtype is None else weight[start:stop].to(self.dtype)
        logits = logits_f32(hidden.reshape(batch * width, size), rows_).view(batch, width, -1)
        grad = logits.sub_(self.lse.unsqueeze(-1)).exp_()
        inside = (self.targets >= start) & (self.targets < stop)
        grad.scatter_add_(2, (self.targets - start).clamp_(0, stop - start - 1).unsqueeze(-1),
                          -inside.to(grad.dtype).unsqueeze(-1))
        grad.mul_(self.weight.unsqueeze(-1))  # padding slots: weight 0
        return matmul_f32(grad.transpose(1, 2).to(hidden.dtype), hidden)


class _Plan:
    """What the passes over one model learned, kept for the model's lifetime (one check per class, not per batch).

    * ``verdict``: per module class, ``"rule"`` (its closed-form rule matched the exact per-sample gradient on the
      first call checked), ``"generic"`` (no rule, or the rule did not match: per-module vmap / per-sample
      autograd of that module alone) or ``"exact"`` (not even that works: the exact path below).
    * ``exact``: parameters no module-level path can cover (used outside a call of their module, as PEFT's
      ``ParameterDict`` adapters are; owned by a module that is not called on batch-first tensors, as fused MoE
      experts and routers are; or never seen in the forward). They keep
      ``requires_grad`` during the pass and get their per-sample gradients from one plain ``torch.autograd.grad``
      per sample of that sample's loss (exact, at about one backward per sample).
    * ``flat``: per module class called on flattened tokens, whether its rows were found grouped by sample.
    * ``seen``: the parameter names whose use was watched once (the first pass that wanted them).
    """

    def __init__(self):
        self.verdict: dict[type, str] = {}
        self.exact: dict[str, str] = {}
        self.seen: set[str] = set()
        self.logged: set = set()
        self.flat: dict[type, bool] = {}  # per class: rows of its flattened-token calls are batch-major (checked)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(model: torch.nn.Module) -> _Plan:
    plan = _PLANS.get(model)
    if plan is None:
        plan = _PLANS[model] = _Plan()
    return plan


def _log_once(plan: _Plan, key, level: int, message: str) -> None:
    if key not in plan.logged:
        plan.logged.add(key)
        logger.log(level, message)


class _Restart(Exception):
    """The forward found parameters that need the exact path: run the batch again with them differentiable."""


def _per_sample_tensor(t, batch: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch


class _Split:
    """A module call with every per-sample tensor argument (first dimension = batch) split out, the rest shared."""

    def __init__(self, args, kwargs, batch: int):
        self.leaves, self.spec = tree_flatten((tuple(args), dict(kwargs)))
        self.split = [i for i, t in enumerate(self.leaves) if _per_sample_tensor(t, batch)]

    def tensors(self) -> list[torch.Tensor]:
        return [self.leaves[i].detach() for i in self.split]

    def call(self, module, params, per_sample: list[torch.Tensor]):
        leaves = list(self.leaves)
        for i, t in zip(self.split, per_sample):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self.spec)
        return functional_call(module, params, args, kwargs)


def _autocast_off(device: torch.device):
    """The per-sample math runs in fp32 even under an enclosing ``torch.autocast``."""
    return torch.autocast(device_type=device.type, enabled=False)


def _autocast_state(device: torch.device):
    try:
        return (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
    except (RuntimeError, TypeError):  # pragma: no cover - a device type autocast does not know
        return None


class _DirectUses(TorchFunctionMode):
    """Watches the forward for wanted parameters used by torch functions outside a call of a module owning them."""

    def __init__(self, capture: _Capture):
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        capture = self.capture
        # Only calls that produce a tensor count (metadata such as ``weight.dtype`` does not).
        if capture.active and any(isinstance(t, torch.Tensor) for t in tree_flatten(result)[0]):
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.nn.Parameter):
                    name = capture.name_of.get(id(t))
                    if name is not None and not any(capture.running.get(m) for m in capture.owners[name]):
                        capture.direct.setdefault(name, func)
        return result


class _Capture:
    """Forward hooks that record each owning module's inputs, tensor hooks that record its output gradients."""

    def __init__(self, model, params: dict[str, torch.nn.Parameter], consumer: Consumer, batch_size: int,
                 chunk_elements: int, plan: _Plan, watch: bool):
        self.consumer, self.chunk_elements, self.batch_size = consumer, chunk_elements, batch_size
        self.params, self.plan, self.watch = params, plan, watch
        self.own = {n: local_rows(p) for n, p in params.items()}  # this rank's rows of each sharded parameter
        # FSDP2 shards, or DeepSpeed ZeRO-3 partitions: a module cannot be re-run alone, the rules are trusted
        self.sharded = any(own is not None for own in self.own.values()) or any(_zero3(p) for p in params.values())
        self.name_of = {id(p): n for n, p in params.items()}
        self.owners: dict[str, list[torch.nn.Module]] = {n: [] for n in params}
        self.module_names: dict[torch.nn.Module, str] = {}
        self.owned: dict[torch.nn.Module, list[tuple[str, str]]] = {}
        for path, module in model.named_modules(remove_duplicate=False):
            own = [(local, self.name_of[id(p)]) for local, p in module.named_parameters(recurse=False)
                   if id(p) in self.name_of]
            if own and module not in self.module_names:
                self.module_names[module] = path
                for _, name in own:
                    self.owners[name].append(module)
                own = [(local, name) for local, name in own if name not in plan.exact]
                if own:
                    self.owned[module] = own
        self.uses: dict[str, list[_Use]] = {n: [] for n in params}
        self.pending: dict[str, int] = {n: 0 for n in params}
        self.handled: set[str] = set()
        self.called: set[str] = set()
        self.new_exact: dict[str, str] = {}
        self.direct: dict[str, object] = {}
        self.running: dict[torch.nn.Module, int] = {}
        self.roots: list[torch.Tensor] = []
        self.recorded: list[_Use] = []  # every hooked use of this pass, released on exit
        self.flat_uses: list[_Use] = []  # flattened-token calls whose class's row layout is not checked yet
        self.probing = False
        self.probed: dict[int, torch.Tensor] = {}
        self.head: torch.nn.Module | None = None  # the output layer whose loss part is taken from the forward
        self.head_uses: list[tuple[_Use, str, str]] = []
        self.active = False
        self.handles = []

    def __enter__(self):
        # prepend: before DeepSpeed ZeRO-3's post-forward hook releases the module's gathered weights
        modules = self.owned if not self.watch else {m: None for ms in self.owners.values() for m in ms}
        for module in modules:
            if self.watch:
                self.handles.append(module.register_forward_pre_hook(self._enter_hook))
            if module in self.owned:
                self.handles.append(module.register_forward_hook(self._forward_hook, with_kwargs=True, prepend=True))
            elif self.watch:
                self.handles.append(module.register_forward_hook(self._leave_hook))
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False
        for handle in self.handles:
            handle.remove()
        for use in self.recorded:
            use.release()
        self.handles, self.uses, self.roots, self.recorded, self.flat_uses, self.probed = [], {}, [], [], [], {}
        self.head_uses = []

    def describe(self, name: str) -> str:
        modules = self.owners.get(name) or []
        where = ", ".join(f"'{self.module_names[m]}' ({type(m).__name__})" for m in modules) or "no module"
        return f"'{name}' (owned by {where})"

    # ------------------------------------------------------------------------------------------ hooks
    def _enter_hook(self, module, args):
        if self.active:
            self.running[module] = self.running.get(module, 0) + 1

    def _leave_hook(self, module, args, output):
        if self.active and self.running.get(module):
            self.running[module] -= 1

    def _unsupported(self, module, why: str) -> None:
        for _, name in self.owned[module]:
            self.new_exact.setdefault(name, f"{type(module).__name__} {why}")

    def _forward_hook(self, module, args, kwargs, output):
        if not self.active:
            return None
        if self.watch:
            self._leave_hook(module, args, output)
        self.active = False  # the hook's own torch calls and recomputations are not uses of the parameters
        try:
            return self._record(module, args, kwargs, output)
        finally:
            self.active = True

    def _record(self, module, args, kwargs, output):
        for _, name in self.owned[module]:
            self.called.add(name)
        if module is self.head:  # called on an empty sequence: its part comes from the chunked loss
            return None
        batch, replaced = self.batch_size, None
        if not isinstance(output, torch.Tensor) or output.dim() == 0:
            self._unsupported(module, "does not return one tensor")
            return None
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        flat = (output.shape[0] != batch and output.shape[0] % batch == 0 and _kind(module) != "generic"
                and first is not None and first.dim() > 0 and first.shape[0] == output.shape[0]
                and self.plan.flat.get(type(module), True))
        if flat:  # tokens flattened into the first dimension (OPT): rows batch-major, checked once per class
            tokens = output.shape[0] // batch
            args = (first.reshape(batch, tokens, *first.shape[1:]), *args[1:])
            return self._record_use(module, args, kwargs, output, output.reshape(batch, tokens, *output.shape[1:]),
                                    None, flat=True)
        if output.shape[0] != batch:
            if output.shape[0] != 1 or first is None or first.dim() == 0 or first.shape[0] != 1:
                self._unsupported(module, f"is called on tensors whose first dimension is not the batch ({batch})")
                return None
            # Shared across the batch (GPT-2's position embedding): the output gradient of the broadcast tensor
            # would already be summed over samples, so give each sample its own copy.
            args = (first.expand(batch, *first.shape[1:]), *args[1:])
            output = replaced = output.expand(batch, *output.shape[1:])
        return self._record_use(module, args, kwargs, output, output, replaced)

    def _record_use(self, module, args, kwargs, output, view, replaced, flat=False):
        """Record one call; ``view`` is ``output`` with the batch first (a reshape of a flattened-token output)."""
        batch = self.batch_size
        kind = _kind(module)
        if kind != "generic" and not _per_sample_tensor(args[0] if args else None, batch):
            kind = "generic"
        if not _Split(args, kwargs, batch).split:
            self._unsupported(module, "has no argument whose first dimension is the batch")
            return None
        scale = 1.0
        if kind == "embedding" and type(module).forward is not torch.nn.Embedding.forward:
            scale = _embedding_scale(module, args[0], output)
        verdict = self.plan.verdict.get(type(module))
        if verdict is None:
            verdict = self.plan.verdict[type(module)] = self._check(module, kind, args, kwargs, view, scale)
        if verdict == "exact":
            self._unsupported(module, "has no per-sample path that matched the exact per-sample gradient")
            return None
        if verdict == "generic":
            if flat:  # the vmap path needs batch-first calls
                self._unsupported(module, "is called on flattened tokens and its rule does not match")
                return None
            kind = "generic"
        use = _Use(module, kind, args, kwargs, scale, _autocast_state(output.device))
        use.open = len(self.owned[module])
        if flat and type(module) not in self.plan.flat:
            self.flat_uses.append(use)
        for _, name in self.owned[module]:
            self.uses[name].append(use)
            self.pending[name] += 1
        if not output.requires_grad:  # nothing upstream needs a gradient: start the backward graph here
            replaced = output.detach().requires_grad_()
            self.roots.append(replaced)
            output = replaced
        for tensor in (args[0] if args else None, output):  # leaves made to require grad elsewhere (an input-require-grads hook)
            if (isinstance(tensor, torch.Tensor) and tensor.requires_grad and tensor.grad_fn is None
                    and not any(tensor is r for r in self.roots)):
                self.roots.append(tensor)
        output.register_hook(lambda g, use=use: self._backward_hook(use, g))
        use.node = output.grad_fn
        self.recorded.append(use)
        return replaced

    def _check(self, module, kind, args, kwargs, output, scale) -> str:
        """Check a class's rule once: its per-sample gradients against plain per-sample autograd of the module.

        Both are projected on a random direction ``r`` (per parameter) with a random output gradient ``b``:
        ``<g_x, r>`` for every sample x. Returns the verdict (and logs it once when it is not ``"rule"``).
        """
        cls = type(module).__name__
        if self.sharded:  # a sharded module cannot be re-run on its own: FSDP keeps the rules (see the docs)
            return "rule" if kind != "generic" else "generic"
        locals_ = [local for local, _ in self.owned[module]]
        gen = torch.Generator().manual_seed(0)
        probe = _Use(module, kind, args, kwargs, scale, _autocast_state(output.device))
        probe.grad = torch.randn(output.shape, generator=gen).to(device=output.device, dtype=output.dtype)
        params = dict(module.named_parameters(recurse=False))
        direction = {n: torch.randn(params[n].shape, generator=gen).to(params[n].device) for n in locals_}
        with _autocast_off(output.device), torch.no_grad():
            try:
                exact = _per_sample_loop(module, locals_, probe, self.batch_size, project=direction)
            except Exception as error:  # noqa: BLE001 - any failure: this module takes the exact path
                _log_once(self.plan, ("exact", type(module)), logging.WARNING,
                          f"Per-sample gradients: {cls} cannot be differentiated on its own ({error!r}); its "
                          "parameters take the exact per-sample autograd path (about one backward per sample).")
                return "exact"
            if kind != "generic":
                ruled = self._projection(probe, locals_, direction)
                if _agree(ruled, exact, output.dtype):
                    return "rule"
                _log_once(self.plan, ("generic", type(module)), logging.WARNING,
                          f"Per-sample gradients: the '{kind}' rule does not match the exact per-sample gradient "
                          f"of {cls}; it takes the per-module vmap path instead.")
            generic = self._projection(dataclass_replace(probe, "generic"), locals_, direction)
            if _agree(generic, exact, output.dtype):
                if kind == "generic":
                    _log_once(self.plan, ("generic", type(module)), logging.INFO,
                              f"Per-sample gradients: {cls} has no closed-form rule; it takes the per-module vmap "
                              "path.")
                return "generic"
            _log_once(self.plan, ("exact", type(module)), logging.WARNING,
                      f"Per-sample gradients: the vmap path of {cls} does not match plain per-sample autograd; its "
                      "parameters take the exact per-sample autograd path (about one backward per sample).")
            return "exact"

    def _projection(self, use: _Use, locals_: list[str], direction: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sum_p <g_{x,p}, r_p>`` over the module's parameters from this use's rule, in row chunks."""
        total = torch.zeros(self.batch_size, dtype=torch.float64, device=use.grad.device)
        for local in locals_:
            r = direction[local].float()
            if (use.kind, local) in _ROW_KINDS and r.dim() >= 2:
                step = max(1, self.chunk_elements // max(1, self.batch_size * math.prod(r.shape[1:])))
                for start in range(0, r.shape[0], step):
                    rows = slice(start, min(start + step, r.shape[0]))
                    g = self._grad(use, local, rows)
                    total += (g.reshape(self.batch_size, -1) @ r[rows].reshape(-1)).double()
            else:
                g = self._grad(use, local, None) if use.kind != "generic" else _module_per_sample_grads(
                    use.module, [local], use, self.batch_size)[local]
                total += (g.reshape(self.batch_size, -1) @ r.reshape(-1)).double()
        use.cache = None
        return total

    def check_layout(self, losses: torch.Tensor, labels: torch.Tensor) -> None:
        """Check once per class that flattened-token calls hold the tokens of sample x in rows ``x*T .. x*T+T-1``.

        One exact backward of the loss of the sample with the most labelled tokens: under that layout its output
        gradient is zero in every other sample's rows. A class that fails takes the exact path (restart)."""
        sample = int((labels != -100).sum(1).argmax())
        inputs = self.roots + [p for n, p in self.params.items() if n in self.plan.exact]
        if not losses.requires_grad or not inputs:
            return
        self.probing = True
        try:
            torch.autograd.grad(losses[sample], inputs, retain_graph=True, allow_unused=True)
        finally:
            self.probing = False
        verdicts: dict[type, bool] = {}
        for use in self.flat_uses:
            g = self.probed.pop(id(use), None)
            cls = type(use.module)
            if g is None:
                verdicts.setdefault(cls, None)
                continue
            rows = g.reshape(self.batch_size, -1)
            others = torch.cat([rows[:sample], rows[sample + 1 :]])
            ok = bool((others == 0).all()) and bool((rows[sample] != 0).any())
            verdicts[cls] = ok and verdicts.get(cls) is not False
        for cls, ok in verdicts.items():
            if ok is None:  # no gradient reached this class in the probe: decide on a later batch
                continue
            self.plan.flat[cls] = ok
            if not ok:
                for use in self.flat_uses:
                    if type(use.module) is cls:
                        for _, name in self.owned[use.module]:
                            self.plan.exact.setdefault(name, f"{cls.__name__} is called on flattened tokens whose "
                                                       "rows are not batch-major")
                            self.new_exact[name] = self.plan.exact[name]
                _log_once(self.plan, ("flat", cls), logging.WARNING,
                          f"Per-sample gradients: {cls.__name__} is called on flattened tokens whose rows are not "
                          "grouped by sample; its parameters take the exact per-sample autograd path.")
        if self.new_exact:
            raise _Restart

    def head_losses(self, model, batch: dict[str, torch.Tensor], head: torch.nn.Linear, loss_scale: float
                    ) -> torch.Tensor:
        """The response losses with the output layer's part over token chunks (:mod:`hf_lwf.method.head`); records
        that part for the output layer's weight (one use, finished with the other uses of a tied weight)."""
        self.head = head
        hidden = head_hidden(model, batch, head)
        self.active = False  # the loss's own use of the weight is not a use outside the module
        try:
            selection = select_labelled(hidden, batch["labels"])
            name = self.name_of.get(id(head.weight))
            local = next((loc for loc, n in self.owned.get(head, []) if n == name), None)
            record = (_HeadRecord(selection, self.batch_size, loss_scale, autocast_dtype(hidden.device))
                      if local is not None else None)
            on_chunk = None
            if record is not None and self.consumer.linear:
                v = self.consumer.direction(name, self.own[name])
                if v is not None:
                    record.values = torch.zeros(self.batch_size, dtype=torch.float32, device=hidden.device)
                    inputs = selection.hidden.detach()

                    def on_chunk(rows, grad):  # sum_t b_t . (v h_t): no per-sample gradient of the weight
                        projected = project_f32(inputs[rows] if record.dtype is None else inputs[rows].to(record.dtype),
                                                v.t())
                        record.values.index_add_(0, selection.sample[rows], (grad * projected).sum(1) * loss_scale)

            stats: dict[str, torch.Tensor] = {}
            losses = chunked_cross_entropy(selection, head.weight, loss_chunk_elements(hidden.device), unit=True,
                                           grad_scale=loss_scale, on_chunk=on_chunk, stats=stats)
            if record is not None:
                record.lse[record.index] = stats["lse"]
                use = _Use(head, "head", (record,), {})
                use.grad, use.reached = record.weight, True  # stands for the logits' gradient, formed per row block
                self.uses[name].append(use)
                self.recorded.append(use)
                self.head_uses.append((use, local, name))
            return losses
        finally:
            self.active = True

    def _backward_hook(self, use: _Use, grad_output: torch.Tensor) -> None:
        if not self.active:  # the exact path's per-sample backwards pass through the hooked outputs too
            return
        if self.probing:  # the layout probe: record, consume nothing
            self.probed[id(use)] = grad_output.detach()
            return
        use.grad, use.reached = grad_output.detach(), True
        with _autocast_off(grad_output.device):
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

    def flush(self, losses: torch.Tensor) -> None:
        """Finish the parameters some of whose uses got no gradient (outputs that do not reach the loss: zero).

        An output that got no gradient although the loss depends on it would be a silent zero: that is an error."""
        idle = [u for uses in self.uses.values() for u in uses if not u.reached and u.node is not None]
        if idle and losses.grad_fn is not None:
            reachable, stack = set(), [losses.grad_fn]
            while stack:
                node = stack.pop()
                if node is not None and node not in reachable:
                    reachable.add(node)
                    stack.extend(next_node for next_node, _ in node.next_functions)
            lost = [u for u in idle if u.node in reachable]
            if lost:
                module = lost[0].module
                raise RuntimeError(
                    f"Per-sample gradients: the output of '{self.module_names[module]}' ({type(module).__name__}) "
                    "is on the loss's graph but the backward did not reach it (a tensor that requires grad outside "
                    "the parameters?); its per-sample gradients would be silently zero.")
        if self.consumer.linear:
            for use, local, name in self.head_uses:
                self._linear(use, local, name)
        for name in list(self.uses):
            if self.uses[name]:
                if not self.consumer.linear:
                    with _autocast_off(self.params[name].device):
                        self._finish(name)
                self.handled.add(name)

    # ------------------------------------------------------------------------------------ per-sample math
    def _finish(self, name: str) -> None:
        every = self.uses.pop(name)
        self.uses[name] = []
        try:
            self._form(name, [u for u in every if u.grad is not None])
        finally:
            for use in every:
                use.done()

    def _form(self, name: str, uses: list[_Use]) -> None:
        """Feed the consumer the per-sample gradients of ``name``, the sum over its ``uses``, in row blocks."""
        self.handled.add(name)  # no use with a gradient: no output reached the loss, the gradient is zero
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
        # an output layer's row block also holds its logits [batch, width, rows]
        row_numel = max([row_numel] + [u.args[0].width for u in uses if u.kind == "head"])
        step = max(1, self.chunk_elements // max(1, batch * row_numel))
        first, last = (0, shape[0]) if own is None else (own.start, own.stop)
        # Dense uses first; embedding rows are then added into their block in place (no dense copy of their own).
        ordered = sorted(zip(uses, locals_), key=lambda pair: pair[0].kind == "embedding")
        for start in range(first, last, step):
            rows = slice(start, min(start + step, last))
            total = None
            for use, local in ordered:
                if use.kind == "embedding" and total is not None:
                    self._embedding_grad(use, use.grad, rows, out=total)
                    continue
                g = self._grad(use, local, rows)
                total = g if total is None else total.add_(g)
            self.consumer.dense(name, rows, total)

    def _local(self, use: _Use, name: str) -> str:
        return next(local for local, n in self.owned[use.module] if n == name)

    def _grad(self, use: _Use, local: str, rows: slice | None) -> torch.Tensor:
        """Per-sample gradient ``[batch, *param[rows].shape]`` (fp32) of the module's parameter ``local`` from this use.

        The output gradient is sliced to ``rows`` before it is cast to fp32 (an ``lm_head`` chunk reads only its
        columns of the ``[batch, tokens, vocab]`` gradient)."""
        batch = self.batch_size
        b = use.grad
        x = use.args[0]
        if use.kind == "head":
            return x.grad(getattr(use.module, local).detach(), rows)
        if use.kind in ("linear", "conv1d"):
            b = b.reshape(batch, -1, b.shape[-1])
            if local == "bias":
                return b.float().sum(1)
            a = x.reshape(batch, -1, x.shape[-1])
            # 16-bit activations and output gradients stay 16-bit, accumulated in fp32 (tensor cores on a GPU)
            if use.kind == "linear":  # weight [out, in]: rows are output features
                return matmul_f32((b if rows is None else b[..., rows]).transpose(1, 2), a)
            return matmul_f32((a if rows is None else a[..., rows]).transpose(1, 2), b)  # Conv1D
        if use.kind == "embedding":
            return self._embedding_grad(use, b, rows)
        if use.kind == "layernorm":
            module = use.module
            b = b.float().reshape(batch, -1, *module.normalized_shape)
            if local == "bias":
                return b.sum(1)
            xhat = F.layer_norm(x.float(), module.normalized_shape, None, None, module.eps)
            return (b * xhat.reshape_as(b)).sum(1)
        if use.kind == "rmsnorm" and local == "weight":
            xhat = _rms_normalized(use.module, x.detach()).float()
            return (b.float() * xhat).reshape(batch, -1, b.shape[-1]).sum(1)
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
        # every token adds its row, zero outside these rows: no boolean indexing (a device-to-host sync per block)
        values = b * (keep * use.scale).unsqueeze(-1)  # fp32 (keep * scale is), never in place on the gradient
        out.index_put_((sample, (ids - start).clamp_(0, stop - start - 1)), values.to(out.dtype), accumulate=True)
        return out

    def _generic_grad(self, use: _Use, local: str) -> torch.Tensor:
        if use.cache is None:
            use.cache = _module_per_sample_grads(use.module, [n for n, _ in self.owned[use.module]], use,
                                                 self.batch_size, self)
        return use.cache.pop(local)

    def _linear(self, use: _Use, local: str, name: str) -> None:
        """``sum_i v_i g_{x,i}`` for this use only (linear consumers): no per-sample weight gradient formed.

        Under FSDP ``v`` covers this rank's rows only, and so does the sum."""
        consumer, batch, own = self.consumer, self.batch_size, self.own[name]
        self.handled.add(name)
        if use.kind == "head":  # formed in the forward
            if use.args[0].values is not None:
                consumer.add_linear(name, use.args[0].values)
            return
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
                rows = F.embedding(ids, v.float()) * keep.unsqueeze(-1)
                values = (rows * b.float().reshape(batch, -1, b.shape[-1])).sum((1, 2)) * use.scale
            else:
                x = use.args[0]
                a = x.reshape(batch, -1, x.shape[-1])
                b = b.reshape(batch, -1, b.shape[-1])
                if use.kind == "linear":  # weight [out, in]: the shard holds output rows
                    b = b if own is None else b[..., own]
                else:  # Conv1D weight [in, out]: the shard holds input rows; b_t . (v a_t) with the roles swapped
                    a, b = b, (a if own is None else a[..., own])
                # b_t . (v a_t), projected through v on the narrower side (fewer fp32 numbers to multiply)
                if v.shape[0] >= v.shape[1]:
                    values = (project_f32(b, v) * a).sum((1, 2))
                else:
                    values = (project_f32(a, v.t()) * b).sum((1, 2))
            consumer.add_linear(name, values.float())
            return
        g = self._grad(use, local, None)
        g = g if own is None else g[:, own]
        consumer.add_linear(name, g.reshape(batch, -1) @ v.reshape(-1).float())


def dataclass_replace(use: _Use, kind: str) -> _Use:
    """A copy of ``use`` that takes the path ``kind``."""
    copy = _Use(use.module, kind, use.args, use.kwargs, use.scale, use.autocast)
    copy.grad = use.grad
    return copy


def _agree(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Per-sample projections agree to 1e-3 of the largest (fp32), 3e-2 for 16-bit modules."""
    tolerance = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    scale = float(expected.abs().max())
    return bool(torch.isfinite(actual).all()) and float((actual - expected).abs().max()) <= tolerance * max(scale, 1e-30)


def _embedding_scale(module: torch.nn.Embedding, ids: torch.Tensor, output: torch.Tensor) -> float:
    """``s`` with ``output == s * lookup`` for an embedding subclass that rescales its rows (Gemma's ``embed_scale``).

    Least squares over the call; the class check then confirms the rule with that ``s`` against exact autograd."""
    weight = module.weight.detach()
    if is_sharded(weight):  # FSDP2 has resharded the weight by now: take the scale the Gemma family stores
        scale = getattr(module, "embed_scale", None)
        if scale is None:
            raise NotImplementedError(f"Per-sample gradients under FSDP: {type(module).__name__} overrides the "
                                      "forward of nn.Embedding and cannot be checked on a sharded weight.")
        return float(scale)
    lookup = F.embedding(ids, weight, module.padding_idx).float()
    denominator = float(lookup.square().sum())
    if denominator == 0.0:
        return 1.0
    return float((output.detach().float() * lookup).sum()) / denominator


def _module_per_sample_grads(module, locals_, use: _Use, batch: int, capture: _Capture | None = None
                             ) -> dict[str, torch.Tensor]:
    """Per-sample gradients of ``module``'s own parameters ``locals_`` from one recorded call and its output gradient.

    Every argument whose first dimension is the batch is split per sample, the rest shared. ``torch.func.vmap``
    first; if that transform fails, a plain per-sample backward through this module only."""
    params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if n in locals_}
    split = _Split(use.args, use.kwargs, batch)
    per_sample = split.tensors()
    grad_output = use.grad.float()
    was_active = capture.active if capture is not None else False
    if capture is not None:
        capture.active = False
    try:
        with _autocast_as(use):
            try:
                def inner(p, xs, g):
                    out = split.call(module, p, [x.unsqueeze(0) for x in xs])
                    return (out.float() * g.unsqueeze(0)).sum()

                grads = vmap(grad(inner), in_dims=(None, 0, 0))(params, per_sample, grad_output)
                return {n: g.float() for n, g in grads.items()}
            except Exception:  # noqa: BLE001 - any transform failure: the plain per-sample backward below
                pass
            return _per_sample_loop(module, locals_, use, batch)
    finally:
        if capture is not None:
            capture.active = was_active


def _autocast_as(use: _Use):
    """The autocast state the module ran under in the forward (recomputations see the same dtypes)."""
    device = use.grad.device
    if use.autocast is None:
        return contextlib.nullcontext()
    enabled, dtype = use.autocast
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _per_sample_loop(module, locals_, use: _Use, batch: int, project: dict[str, torch.Tensor] | None = None):
    """Plain autograd, one sample at a time, through this module only: ``d <module(x_i), b_i> / d theta``.

    With ``project``, returns ``sum_p <g_{i,p}, project_p>`` per sample ``[batch]`` (fp64) instead of the gradients."""
    split = _Split(use.args, use.kwargs, batch)
    per_sample = split.tensors()
    live = {n: p.detach().requires_grad_() for n, p in module.named_parameters(recurse=False) if n in locals_}
    out = {n: [] for n in live}
    values = torch.zeros(batch, dtype=torch.float64, device=use.grad.device)
    with torch.enable_grad(), _autocast_as(use):
        for i in range(batch):
            y = split.call(module, live, [x[i : i + 1] for x in per_sample])
            gs = torch.autograd.grad((y.float() * use.grad[i : i + 1].float()).sum(), list(live.values()),
                                     allow_unused=True)
            for (n, p), g in zip(live.items(), gs):
                g = torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()
                if project is None:
                    out[n].append(g)
                else:
                    values[i] += _dot64(g, project[n])
    if project is not None:
        return values
    return {n: torch.stack(v) for n, v in out.items()}


def _dot64(a: torch.Tensor, b: torch.Tensor, block: int = 1 << 20) -> float:
    """``sum(a * b)`` accumulated in fp64, a block at a time (no fp64 copy of a whole embedding-sized tensor)."""
    a, b = a.reshape(-1), b.reshape(-1)
    return float(sum(torch.dot(a[s : s + block].double(), b[s : s + block].double()) for s in range(0, a.numel(), block)))


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
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None,
    params: dict[str, torch.nn.Parameter],
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """One forward+backward of ``sum_x loss_fn(model, batch)[x]`` feeding the per-sample gradients of ``params``
    to ``consumer``. Returns the per-sample losses. The caller chooses train/eval mode.

    ``loss_fn=None``: the response loss of ``batch["labels"]`` (:func:`~hf_lwf.method.head.response_losses`), whose
    output-layer part runs over token chunks and gives the output layer's per-sample gradients in row blocks
    without the ``[batch, tokens, vocab]`` logits or their gradient (:class:`_HeadRecord`).

    The first pass over a model checks each module class's rule against exact per-sample autograd and watches how
    every wanted parameter is used (:class:`_Plan`); parameters no module-level path covers take the exact path.
    Raises ``RuntimeError`` naming the parameter and its module if any wanted parameter received no per-sample
    contribution.

    ``loss_scale``: the sum is multiplied by it before the backward (fp16: small gradients do not underflow), so
    every per-sample gradient the consumer sees is ``loss_scale`` times the true one; the caller divides."""
    wanted = {n: p for n, p in params.items() if consumer.wants(n)}
    plan = _plan(model)
    for _ in range(3):
        try:
            return _pass(model, batch, consumer, loss_fn, params, wanted, plan, chunk_elements, loss_scale)
        except _Restart:
            continue
    raise RuntimeError("Per-sample gradients: the set of parameters that need the exact path did not settle.")


def _pass(model, batch, consumer, loss_fn, params, wanted, plan: _Plan, chunk_elements: int,
          loss_scale: float = 1.0) -> torch.Tensor:
    batch_size = batch["input_ids"].shape[0]
    if batch["input_ids"].device.type == "cpu":
        chunk_elements = min(chunk_elements, CPU_CHUNK_ELEMENTS)
    # Under ZeRO-3 DeepSpeed's own hooks gather and release every parameter around its module's call, so the
    # first-pass watch cannot tell a direct use from theirs: the rules are trusted there, as under FSDP.
    watch = not set(wanted) <= plan.seen and not any(_zero3(p) for p in wanted.values())
    exact = [n for n in wanted if n in plan.exact]
    capture = _Capture(model, wanted, consumer, batch_size, chunk_elements, plan, watch)
    if exact and capture.sharded:
        raise NotImplementedError(
            "Per-sample gradients: under FSDP every trainable parameter needs a per-module rule, but "
            + ", ".join(f"{capture.describe(n)}: {plan.exact[n]}" for n in exact[:3])
            + ". The exact per-sample path is not available on sharded parameters: train this model with DDP or on "
            "one device, or freeze these parameters.")
    frozen = [p for n, p in params.items() if n not in exact]
    mode = _DirectUses(capture) if watch else contextlib.nullcontext()
    head = linear_head(model, batch) if loss_fn is None else None
    with without_input_require_grads(model), _frozen(frozen), torch.enable_grad(), capture:
        with mode:
            if head is not None:
                losses = capture.head_losses(model, batch, head, loss_scale)
            else:
                losses = (loss_fn or batch_losses)(model, batch)
        if watch:
            for name in wanted:
                if name in plan.exact:
                    continue
                if name in capture.direct:
                    capture.new_exact.setdefault(name, f"is used by {getattr(capture.direct[name], '__name__', 'a torch function')} outside a call of its module")
                elif name not in capture.called:
                    capture.new_exact.setdefault(name, "took no part in the first forward through a call of its module")
        if capture.new_exact:
            groups: dict[tuple, list[str]] = {}
            for name, why in capture.new_exact.items():
                plan.exact[name] = why
                owner = capture.owners[name][0] if capture.owners[name] else None
                groups.setdefault((type(owner), why), []).append(name)
            for key, names in groups.items():  # once per owning class and reason
                more = f" (and {len(names) - 1} more parameters of that class)" if len(names) > 1 else ""
                _log_once(plan, key, logging.INFO,
                          f"Per-sample gradients: {capture.describe(names[0])}{more} {key[1]}; they take the exact "
                          "per-sample autograd path (about one backward per sample).")
            raise _Restart
        if capture.flat_uses:
            capture.check_layout(losses, batch["labels"])
        if watch:
            plan.seen.update(wanted)
        # The backward must reach every hooked output: from the roots (outputs that did not require grad, input
        # leaves) and from the exact-path parameters, upstream of which every other hooked output lies.
        inputs = capture.roots + [params[n] for n in exact]
        if inputs and losses.requires_grad:
            torch.autograd.grad(losses.sum() * loss_scale, inputs, allow_unused=True, retain_graph=bool(exact))
        capture.flush(losses)
        capture.active = False
        _exact_pass(capture, losses, exact, batch_size, loss_scale)
        for name in wanted:  # called in an earlier batch, not in this one (an idle expert): its gradient is zero
            if name not in capture.called and name not in plan.exact and name in plan.seen and not watch:
                capture.handled.add(name)
        missing = [n for n in wanted if n not in capture.handled]
        if missing:
            raise RuntimeError(
                "Per-sample gradients: no per-sample contribution was computed for "
                + ", ".join(capture.describe(n) for n in missing[:5])
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                + ". This is a bug in hf_lwf's per-sample pass; please report it with the model's class.")
    return losses.detach()


def _zero3(param: torch.Tensor) -> bool:
    """Whether ``param`` is partitioned by DeepSpeed ZeRO-3 (it carries DeepSpeed's ``ds_id``)."""
    return hasattr(param, "ds_id")


def _exact_pass(capture: _Capture, losses: torch.Tensor, names: list[str], batch: int, loss_scale: float = 1.0) -> None:
    """Per-sample gradients of ``names`` by plain autograd: one backward of each sample's loss (times
    ``loss_scale``, as in the batched pass)."""
    if not names:
        return
    consumer = capture.consumer
    params = [capture.params[n] for n in names]
    values = {n: torch.zeros(batch, dtype=torch.float32, device=losses.device) for n in names}
    directions = {n: consumer.direction(n, None) for n in names} if consumer.linear else {}

    def feed(grads, samples: slice) -> None:
        for name, g in zip(names, grads):
            if g is None:  # not on the graph of these samples' losses: an exact zero
                continue
            with _autocast_off(g.device):
                g = g.detach().float()
                if consumer.linear:
                    v = directions[name]
                    if v is not None:
                        values[name][samples] += (g.reshape(g.shape[0], -1) @ v.reshape(-1).float()).to(values[name].device)
                elif samples.stop - samples.start == batch:
                    consumer.dense(name, None, g)
                else:
                    consumer.dense(name, None, g, sample=samples.start)

    if losses.requires_grad:  # (a vmapped backward, is_grads_batched, measured slower than this loop on CPU)
        for i in range(batch):
            grads = torch.autograd.grad(losses[i] * loss_scale, params, retain_graph=i + 1 < batch, allow_unused=True)
            feed([None if g is None else g.unsqueeze(0) for g in grads], slice(i, i + 1))
    for name in names:
        if consumer.linear:
            consumer.add_linear(name, values[name])
        capture.handled.add(name)


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
