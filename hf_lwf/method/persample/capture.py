"""The hooks of one pass: forward hooks record each owning module's inputs, tensor hooks its output gradients, and
each parameter's per-sample gradients are formed through its family's rule (:mod:`.rules`) as soon as its last use
has its output gradient.

The per-sample gradient of a weight is formed in chunks of rows (at most ``chunk_elements`` numbers at once),
reduced by the consumer and dropped at once. A parameter used by several modules (tied ``lm_head``/embedding) has one
gradient per sample, the *sum* of the uses: its chunks are summed over uses before they are squared. A linear
consumer gets ``sum_i v_i g_{x,i}`` use by use, without the per-sample gradient of a weight where the rule allows.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ...distributed import local_rows
from ..common import project_f32
from ..head import autocast_dtype, chunked_cross_entropy, head_hidden, loss_chunk_elements, select_labelled
from .consumers import Consumer
from .exact import _module_per_sample_grads
from .plan import _log_once, _Plan, _Restart, check_class
from .record import _autocast_off, _autocast_state, _per_sample_tensor, _Split, _Use, _zero3
from .rules import named, rule_for
from .rules.output import _HeadRecord


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
        rule = rule_for(module)
        flat = (output.shape[0] != batch and output.shape[0] % batch == 0 and rule is not None
                and first is not None and first.dim() > 0 and first.shape[0] == output.shape[0]
                and self.plan.flat.get(type(module), True))
        if flat:  # tokens flattened into the first dimension (OPT): rows batch-major, checked once per class
            tokens = output.shape[0] // batch
            args = (first.reshape(batch, tokens, *first.shape[1:]), *args[1:])
            return self._record_use(module, rule, args, kwargs, output,
                                    output.reshape(batch, tokens, *output.shape[1:]), None, flat=True)
        if output.shape[0] != batch:
            if output.shape[0] != 1 or first is None or first.dim() == 0 or first.shape[0] != 1:
                self._unsupported(module, f"is called on tensors whose first dimension is not the batch ({batch})")
                return None
            # Shared across the batch (GPT-2's position embedding): the output gradient of the broadcast tensor
            # would already be summed over samples, so give each sample its own copy.
            args = (first.expand(batch, *first.shape[1:]), *args[1:])
            output = replaced = output.expand(batch, *output.shape[1:])
        return self._record_use(module, rule, args, kwargs, output, output, replaced)

    def _record_use(self, module, rule, args, kwargs, output, view, replaced, flat=False):
        """Record one call; ``view`` is ``output`` with the batch first (a reshape of a flattened-token output)."""
        batch = self.batch_size
        if rule is not None and not _per_sample_tensor(args[0] if args else None, batch):
            rule = None
        if not _Split(args, kwargs, batch).split:
            self._unsupported(module, "has no argument whose first dimension is the batch")
            return None
        scale = 1.0 if rule is None else rule.scale(module, args[0], output)
        verdict = self.plan.verdict.get(type(module))
        if verdict is None:
            verdict = self.plan.verdict[type(module)] = self._check(module, rule, args, kwargs, view, scale)
        if verdict == "exact":
            self._unsupported(module, "has no per-sample path that matched the exact per-sample gradient")
            return None
        if verdict == "generic":
            if flat:  # the vmap path needs batch-first calls
                self._unsupported(module, "is called on flattened tokens and its rule does not match")
                return None
            rule = None
        use = _Use(module, rule, args, kwargs, scale, _autocast_state(output.device))
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

    def _check(self, module, rule, args, kwargs, output, scale) -> str:
        """The class's verdict (:func:`~hf_lwf.method.persample.plan.check_class`). A sharded module cannot be
        re-run on its own: FSDP and ZeRO-3 keep the rules (see the docs)."""
        if self.sharded:
            return "rule" if rule is not None else "generic"
        locals_ = [local for local, _ in self.owned[module]]
        return check_class(self.plan, module, rule, args, kwargs, output, scale, locals_, self.batch_size,
                           self.chunk_elements, self._grad)

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
                use = _Use(head, named("head"), (record,), {})
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
        chunkable = len(shape) >= 2 and all(u.rule is not None and loc in u.rule.rows for u, loc in zip(uses, locals_))
        if not chunkable:
            total = None
            for use, local in zip(uses, locals_):
                g = self._grad(use, local, None)
                total = g if total is None else total.add_(g)
            self.consumer.dense(name, own, total if own is None else total[:, own])
            return
        batch = self.batch_size
        row_numel = math.prod(shape[1:])
        row_numel = max([row_numel] + [u.rule.block_numel(u) for u in uses])
        step = max(1, self.chunk_elements // max(1, batch * row_numel))
        first, last = (0, shape[0]) if own is None else (own.start, own.stop)
        # Dense uses first; embedding rows are then added into their block in place (no dense copy of their own).
        ordered = sorted(zip(uses, locals_), key=lambda pair: pair[0].rule.accumulates)
        for start in range(first, last, step):
            rows = slice(start, min(start + step, last))
            total = None
            for use, local in ordered:
                if use.rule.accumulates and total is not None:
                    use.rule.grad(use, local, rows, batch, out=total)
                    continue
                g = self._grad(use, local, rows)
                total = g if total is None else total.add_(g)
            self.consumer.dense(name, rows, total)

    def _local(self, use: _Use, name: str) -> str:
        return next(local for local, n in self.owned[use.module] if n == name)

    def _grad(self, use: _Use, local: str, rows: slice | None) -> torch.Tensor:
        """Per-sample gradient ``[batch, *param[rows].shape]`` (fp32) of the module's parameter ``local`` from this use:
        its rule's, or the module-level fallback's where the use has no rule or the rule does not cover ``local``."""
        if use.rule is not None:
            g = use.rule.grad(use, local, rows, self.batch_size)
            if g is not None:
                return g
        return self._generic_grad(use, local)

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
        rule = use.rule
        if rule is not None and rule.in_forward:
            values = rule.project(use, local, None, own, batch)
            if values is not None:
                consumer.add_linear(name, values)
            return
        if own is not None and own.start == own.stop:
            return
        v = consumer.direction(name, own)
        if v is None:
            return
        values = None if rule is None else rule.project(use, local, v, own, batch)
        if values is not None:
            consumer.add_linear(name, values.float())
            return
        g = self._grad(use, local, None)
        g = g if own is None else g[:, own]
        consumer.add_linear(name, g.reshape(batch, -1) @ v.reshape(-1).float())
