"""The per-sample rules, one module per layer family, registered in the order :func:`rule_for` tries them."""

from . import conv1d, embedding, linear, norms, output  # noqa: F401 - each registers its rules
from .base import RULES, Rule, named, register, rule_for


__all__ = ["RULES", "Rule", "named", "register", "rule_for"]
