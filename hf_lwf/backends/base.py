"""The backend interface, with the whole-parameter behaviour (a single process, DDP) as its defaults."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from ..distributed import full_tensor, input_device, local_rows
from ..method import fisher as fisher_lib
from ..method.common import TensorDict
from ..method.unlearn import PreconditionedAscent, ascent_step
from ..state import LWFState


class Ascent:
    """One bounded gradient-ascent step on a D_U mini-batch (:mod:`hf_lwf.ascent` builds it for a backend)."""

    def step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, loss_cap: float, max_grad_norm: float
             ) -> dict:
        raise NotImplementedError


class Backend:
    """A single process or DDP: whole parameters on every rank, ``p.grad`` after backward, collectives of our own.

    Subclasses override what their engine does differently; the defaults are the whole-parameter behaviour.
    """

    name = "local"
    partitioned = False  # F and theta_ref are held in parts across ranks: saving them is collective
    owns_optimizer_step = False  # the engine steps the optimizer inside backward: gradients are read in its step

    # --------------------------------------------------------------------------------------------- checks
    def check(self, config, *, via_trainer: bool, model: torch.nn.Module | None = None) -> None:
        """Refuse, naming the argument and what works, a configuration this engine cannot run."""

    # ------------------------------------------------------------------------------------------ the state
    def snapshot(self, model: torch.nn.Module, out: TensorDict | None = None, device: str | None = None
                 ) -> TensorDict:
        """theta_ref: a copy of the trainable weights in their own dtype (into ``out`` in place when given)."""
        if out:
            return fisher_lib.snapshot(model, out=out)
        return fisher_lib.snapshot(model, device=device)

    def fisher_layout(self, params: dict[str, torch.nn.Parameter], grads: dict | None) -> dict[str, torch.Tensor]:
        """What F's entries are laid out like."""
        return params

    def load_state(self, directory: str, params: dict[str, torch.nn.Parameter]) -> LWFState:
        """The saved state of ``directory``, each tensor as this rank holds it (FSDP2 reads only its own rows)."""
        return LWFState.load(directory, rows={n: local_rows(p) for n, p in params.items()})

    def place(self, state: LWFState, params: dict[str, torch.nn.Parameter], device: str | None) -> None:
        """Move a loaded state next to the parameters (or onto ``device``)."""
        state.place_like(params, device=device)

    def whole_weights(self, model: torch.nn.Module):
        """``(name, whole tensor)`` of every trainable parameter in name order; gathered one at a time from shards
        (collective: every rank iterates)."""
        params = fisher_lib.trainable_parameters(model)
        for name in sorted(params):
            yield name, full_tensor(params[name].detach())

    def tensors_for_saving(self, state: LWFState, params: dict[str, torch.nn.Parameter], keep: bool
                           ) -> dict[str, torch.Tensor] | None:
        """Whole tensors to write (``None``: the state writes its own, unpartitioned tensors). Collective when
        :attr:`partitioned`: every rank calls it; ranks that do not write pass ``keep=False``."""
        return None

    # ------------------------------------------------------------------------------------------- scoring
    def scoring_terms(self, fisher: TensorDict, *, model: torch.nn.Module, reference: TensorDict, scale: float,
                      mask_ratio: float, rates: dict[str, float] | None = None) -> fisher_lib.ScoringTerms:
        return fisher_lib.ScoringTerms.from_state(fisher, model=model, reference=reference, scale=scale,
                                                  mask_ratio=mask_ratio, **({"rates": rates} if rates else {}))

    def empirical_fisher(self, model: torch.nn.Module, examples: list[dict[str, torch.Tensor]], *, batch_size: int,
                         chunk_elements: int, loss_scale: float) -> TensorDict:
        fisher, _ = fisher_lib.empirical_fisher(model, examples, batch_size=batch_size, chunk_elements=chunk_elements,
                                                with_mean=False, loss_scale=loss_scale)
        return fisher

    # ---------------------------------------------------------------------------------- the learning step
    def learning_optimizer(self, optimizer):
        """The torch optimizer whose param groups and state describe the learning step."""
        return raw_optimizer(optimizer)

    def parameter_groups(self, optimizer) -> list[list[torch.nn.Parameter]]:
        """The model parameters of each param group of the learning optimizer, in group order."""
        return [list(group["params"]) for group in self.learning_optimizer(optimizer).param_groups]

    def install_step_hook(self, engine, update) -> None:
        """Run ``update()`` inside the engine's optimizer step (engines that own the step; a no-op here)."""

    def fisher_gradients(self, params: dict[str, torch.nn.Parameter]):
        """``(grads, fetch)`` for an online Fisher read inside the engine's step (engines that own the step)."""
        raise NotImplementedError(f"{type(self).__name__} does not step the optimizer inside backward.")

    # ------------------------------------------------------------------------------------------- the ascent
    def collective_forwards(self, model: torch.nn.Module) -> bool:
        """Whether every rank runs every forward (the scoring and ascent batches are not split across ranks)."""
        return False

    def ascent(self, rule: str, *, optimizer, params: dict[str, torch.nn.Parameter], rates: Sequence[float],
               coef: float, sgd_lr: float | None, loss_scale: float) -> Ascent:
        """The ascent step of ``lwf_unlearn_optimizer=rule`` on whole (or FSDP2-sharded) parameters: backward
        fills ``p.grad`` and :func:`hf_lwf.method.unlearn.ascent_step` clips and steps."""
        raw = raw_optimizer(optimizer)
        if rule == "preconditioned":
            return LocalAscent(PreconditionedAscent(raw, list(params.values()), coef=coef, lrs=rates), coef, loss_scale)
        if rule == "sgd":
            return LocalAscent(torch.optim.SGD(list(params.values()), lr=sgd_lr), coef, loss_scale)
        # 'shared': the raw torch optimizer (accelerate's wrapper would unscale our unscaled gradients under fp16),
        # stepped at `rates`; it writes the ascent gradient into its moments and step count.
        return LocalAscent(raw, coef, loss_scale, rates=rates)

    def device(self, model: torch.nn.Module) -> torch.device:
        return input_device(model)


class LocalAscent(Ascent):
    """:func:`~hf_lwf.method.unlearn.ascent_step` with one optimizer-like ``step`` (``rates``: the param groups'
    learning rates for the step of a ``shared`` optimizer, put back afterwards)."""

    def __init__(self, optimizer, coef: float, loss_scale: float, rates: Sequence[float] | None = None):
        self.optimizer, self.coef, self.loss_scale, self.rates = optimizer, coef, loss_scale, rates

    def step(self, model, batch, *, loss_cap, max_grad_norm):
        with learning_rates(self.optimizer, self.rates):
            return ascent_step(model, batch, self.optimizer, coef=self.coef, loss_cap=loss_cap,
                               max_grad_norm=max_grad_norm, loss_scale=self.loss_scale)


def raw_optimizer(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or ``optimizer`` itself)."""
    return getattr(optimizer, "optimizer", optimizer)


@contextlib.contextmanager
def learning_rates(optimizer, rates: Sequence[float] | None):
    """Set the param groups' ``lr`` to ``rates`` for one step, then put the scheduler's back (None: no change)."""
    if rates is None:
        yield
        return
    saved = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, rates):
        group["lr"] = lr
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr
