"""The rule registry: one closed-form per-sample gradient per layer family.

A rule reads one recorded call (:class:`~hf_lwf.method.persample.record._Use`): its arguments (the first, ``a``,
with the batch first) and its output gradient ``b`` (for sample x, ``d l_x / d out_x``). No rule is trusted as it
stands: the first call of every module class is checked against plain per-sample autograd of that module
(:func:`~hf_lwf.method.persample.plan.check_class`), and a class whose rule does not match takes the module-level
fallback.
"""

from __future__ import annotations

import torch


class Rule:
    """A layer family's per-sample gradients. Subclasses set :attr:`name` and override :meth:`matches` and
    :meth:`grad`; :func:`register` adds one instance to the registry."""

    name = ""
    rows: frozenset[str] = frozenset()
    """The parameters whose per-sample gradient can be formed a block of rows at a time (``grad(rows=...)``)."""
    accumulates = False
    """Whether :meth:`grad` adds into a given row block (``out``) in place, so no dense block of its own is made."""
    in_forward = False
    """Whether a linear consumer's values were formed in the forward (:meth:`project` then ignores ``v``)."""

    def matches(self, module: torch.nn.Module) -> bool:
        """Whether the rule applies to ``module`` (before its class is checked)."""
        return False

    def scale(self, module: torch.nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> float:
        """A factor the call applies on top of the family's own output (see the embedding rule)."""
        return 1.0

    def grad(self, use, local: str, rows: slice | None, batch: int, out: torch.Tensor | None = None
             ) -> torch.Tensor | None:
        """Per-sample gradient ``[batch, *param[rows].shape]`` (fp32) of the module's parameter ``local``, or None
        when the rule does not cover that parameter (it then takes the module-level fallback)."""
        raise NotImplementedError

    def project(self, use, local: str, v: torch.Tensor | None, own: slice | None, batch: int) -> torch.Tensor | None:
        """``sum_i v_i g_{x,i}`` per sample without forming ``g_x`` (``own``: the rows ``v`` covers), or None where
        the rule has no such shortcut (the caller then contracts :meth:`grad` with ``v``)."""
        return None

    def block_numel(self, use) -> int:
        """Numbers per row that a row block of this use holds besides the gradient itself."""
        return 0


RULES: list[Rule] = []
"""Every registered rule, in the order :func:`rule_for` tries them."""


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: add one instance of the rule ``cls`` to the registry."""
    RULES.append(cls())
    return cls


def rule_for(module: torch.nn.Module) -> Rule | None:
    """The first registered rule that applies to ``module``, or None (the module-level fallback)."""
    for rule in RULES:
        if rule.matches(module):
            return rule
    return None


def named(name: str) -> Rule:
    """The registered rule called ``name``."""
    return next(rule for rule in RULES if rule.name == name)
